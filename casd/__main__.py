from casd.cli import main

raise SystemExit(main())
