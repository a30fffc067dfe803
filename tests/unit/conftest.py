"""Make the collection importable as ansible_collections.llmfleet.aws in the unit tests.

The repository root is the collection. Ansible finds it through .ansible/collections (ansible.cfg's
collections_path, a link made by `make venv`); amazon.aws comes from the `ansible` package, in
site-packages' ansible_collections namespace package. Both must resolve under the one name
`ansible_collections`: put the collection tree at the front of sys.path (a temporary one with the same
link when the checkout has none yet) and make sure the namespace package's path includes it.
"""

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _collections_root() -> Path:
    root = REPO / ".ansible" / "collections"
    if (root / "ansible_collections" / "llmfleet" / "aws" / "galaxy.yml").is_file():
        return root
    root = Path(tempfile.mkdtemp(prefix="llmfleet-collections-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    link = root / "ansible_collections" / "llmfleet" / "aws"
    link.parent.mkdir(parents=True)
    link.symlink_to(REPO, target_is_directory=True)
    return root


COLLECTIONS_ROOT = _collections_root()
if str(COLLECTIONS_ROOT) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS_ROOT))

import ansible_collections  # noqa: E402  (a namespace package: site-packages' and ours)

_ours = str(COLLECTIONS_ROOT / "ansible_collections")
if _ours not in list(ansible_collections.__path__):
    ansible_collections.__path__.append(_ours)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real processes (the AWS emulator, ansible)")
