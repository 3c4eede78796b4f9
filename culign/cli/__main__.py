"""`python -m culign.cli`: the same command line as `culign`."""
import sys

from . import main

sys.exit(main())
