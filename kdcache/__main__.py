from kdcache.cli import main

raise SystemExit(main())
