"""`python -P -m splitserve.cluster.nodeagent`: run the node agent until SIGTERM."""

import sys

from splitserve.cluster.nodeagent.agent import main

sys.exit(main())
