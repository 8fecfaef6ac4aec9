"""Print the command lines of README.md's Quick start code block, one per line."""

import re
import sys
from pathlib import Path

readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text(encoding="utf-8")
section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section, re.S).group(1)
for line in block.splitlines():
    if line.strip() and not line.lstrip().startswith("#"):
        print(line.strip())
