from finepose.cli import main

raise SystemExit(main())
