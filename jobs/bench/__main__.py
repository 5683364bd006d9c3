import sys

from jobs.bench import main

sys.exit(main())
