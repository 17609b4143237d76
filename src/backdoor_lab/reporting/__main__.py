from backdoor_lab.reporting.cli import main

raise SystemExit(main())
