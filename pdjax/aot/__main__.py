from pdjax.aot.cli import main

raise SystemExit(main())
