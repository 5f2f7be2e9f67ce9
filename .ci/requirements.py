"""pyproject.toml's requirements, for the lock and CI scripts (docs/compatibility.md).

`python3 .ci/requirements.py ranges EXTRA...` prints the requirements of those extras, as declared;
`python3 .ci/requirements.py lowest EXTRA...` prints `name==lower` for every dependency and those extras'
requirements: the oldest environment CI tests (.ci/lock pins the rest around it).
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
mode, extras = sys.argv[1], sys.argv[2:]
requirements = [] if mode == "ranges" else list(project["dependencies"])
for extra in extras:
    requirements += project["optional-dependencies"][extra]
for requirement in dict.fromkeys(requirements):
    if mode == "ranges":
        print(requirement)
        continue
    match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement)
    if match is None:
        sys.exit(f"{requirement!r} has no lower bound: every dependency needs one (docs/compatibility.md)")
    print(f"{match.group(1)}=={match.group(2)}")
