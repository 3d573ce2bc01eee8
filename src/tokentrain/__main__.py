from tokentrain.cli.main import main

raise SystemExit(main())
