from facedeit.cli import main

raise SystemExit(main())
