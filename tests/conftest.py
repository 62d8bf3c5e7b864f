import os
import sys

# Tests import the shared case list as `cases`.
sys.path.insert(0, os.path.dirname(__file__))
