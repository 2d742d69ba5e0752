from rebased.cli import main

raise SystemExit(main())
