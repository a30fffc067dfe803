#!/usr/bin/env bash
# ansible-test sanity on the collection as it would be built: the collection's files (not the agent's
# sources, the benchmark or CI files) copied under <tmp>/ansible_collections/llmfleet/aws, where
# ansible-test wants them, outside this git work tree (whose ignore rules ansible-test would apply).
# Runs with the current Python and the venv's tools (--local).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d /tmp/llmfleet-sanity-XXXXXX)
trap 'rm -rf "$work"' EXIT
tree=$work/ansible_collections/llmfleet/aws
mkdir -p "$tree"
# what the collection ships: tracked and new files, minus what galaxy.yml's build_ignore leaves out
git ls-files --cached --others --exclude-standard -z \
  | grep -zvE '^(agent/|bench/|scripts/|\.ci/)' \
  | xargs -0 -I{} cp --parents {} "$tree"/
# ansible-test runs pip in venvs of its own with an environment cut down to PATH and HOME, so pip's
# settings from the environment (PIP_CERT, PIP_INDEX_URL, ...) are lost. Give it a home of its own (kept,
# so its venvs are reused) whose pip.conf carries them, and, in its cache, a stand-in for the pip
# bootstrap script it would download from a host that may not be reachable.
test_home=$root/.llmfleet/ansible-test-home
mkdir -p "$test_home/.config/pip" "$test_home/.ansible/test/cache"
{
  echo "[global]"
  env | grep -E '^PIP_[A-Z_]+=' | grep -vE '^PIP_(BREAK_SYSTEM_PACKAGES|REQUIRE_VIRTUALENV)=' \
    | sed -E 's/^PIP_([A-Z_]+)=/\1 = /' | awk -F' = ' '{ gsub("_", "-", $1); print tolower($1) " = " $2 }'
} > "$test_home/.config/pip/pip.conf"
ansible_test_dir=$(python -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')
for version in $(grep -ohE "pip='[0-9.]+'" "$ansible_test_dir/_internal/python_requirements.py" | grep -oE "[0-9.]+"); do
  cp scripts/ansible-test/get_pip.py "$test_home/.ansible/test/cache/get_pip_${version//./_}.py"
done
# the collections our plugins build on, beside ours, so validate-modules resolves their doc fragments
site_collections=$(python -c 'import ansible_collections, os; print(next(iter(ansible_collections.__path__)))' 2>/dev/null \
  || python -c 'import ansible_collections.amazon.aws, os; print(os.path.dirname(os.path.dirname(os.path.dirname(ansible_collections.amazon.aws.__file__))))')
for dependency in amazon community; do
  [ -d "$site_collections/$dependency" ] && ln -s "$site_collections/$dependency" "$work/ansible_collections/$dependency"
done
cd "$tree"
python_version=$("$root/.venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# pip's own progress lines from the sanity venvs are noise here
HOME=$test_home ansible-test sanity --local --python "$python_version" --color no "$@" 2>&1 \
  | grep --line-buffered -vE '^(Collecting |  Downloading |Processing |Installing collected|Successfully installed|Looking in links|Using cached pip| +━)'
exit "${PIPESTATUS[0]}"
