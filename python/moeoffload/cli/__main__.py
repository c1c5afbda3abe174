"""python -m moeoffload.cli"""

import sys

from . import main

sys.exit(main())
