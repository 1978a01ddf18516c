import sys

from simulations.run.launcher import main

sys.exit(main())
