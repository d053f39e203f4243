import sys

from peftkern.cli import main

sys.exit(main())
