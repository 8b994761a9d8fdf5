import sys

from pie.cli.main import main

sys.exit(main())
