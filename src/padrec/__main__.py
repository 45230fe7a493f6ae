import sys

from padrec.cli import main

sys.exit(main())
