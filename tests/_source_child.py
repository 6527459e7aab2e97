"""A streamed run read by one grain worker process, slowed so that a test can kill it
mid-epoch (test_sources.py). Usage: python _source_child.py RUN_DIR"""

import sys
import time

from _source_fixtures import source_run

if __name__ == "__main__":
    source_run(sys.argv[1], workers=1, callback=lambda row: time.sleep(0.2))
