"""``python -m kdray.worker <stage.json URI>``: the command a cluster runs for one stage (see ``kdray.engine.remote``)."""

import sys

from kdray.engine.remote import main

if __name__ == "__main__":
    sys.exit(main())
