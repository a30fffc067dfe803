"""Stand-in for the get-pip.py that ansible-test downloads from a host this machine cannot reach.

ansible-test runs its cached bootstrap script inside each new, pip-less sanity venv with pip's options
and the packages to install (`--disable-pip-version-check pip==24.2 [--no-setuptools] [--no-wheel]`).
This does the same with what is here: Python's bundled pip (ensurepip), then that pip installs the
requested packages from the configured package index. scripts/sanity.sh copies it into ansible-test's
cache.
"""

import ensurepip
import os
import subprocess
import sys

GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}

environ = dict(os.environ)
ensurepip.bootstrap(upgrade=True)
# ensurepip points PIP_CONFIG_FILE at /dev/null for its own run; the real install needs pip's settings
os.environ.clear()
os.environ.update(environ)
args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])
