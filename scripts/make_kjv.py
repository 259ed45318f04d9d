"""
A public-domain free-text data set for the runs of docs/own-data.md: the King James Bible, as
paragraphs of two verses, the first the prompt and the second the answer (the plain-text format
of data/custom/prepare.py). The text comes from Debian's bible-kjv package.

    apt-get install bible-kjv                       # the text and its reader, `bible`
    python scripts/make_kjv.py --out=kjv.txt --books=Ge-De   # Genesis to Deuteronomy, ~1 MB
    python data/custom/prepare.py --input=kjv.txt --name=kjv
"""

import re
import subprocess
import sys


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    first, last = args.get("books", "Ge-De").split("-")
    text = subprocess.run(["bible", "-f", f"{first}1:1-{last}99:99"], capture_output=True,
                          text=True, check=True).stdout
    verses = [m.group(2).strip() for m in re.finditer(r"^(\S+\d+:\d+) (.*)$", text, re.M)]
    with open(args.get("out", "kjv.txt"), "w") as f:
        for a, b in zip(verses[0::2], verses[1::2]):
            f.write(f"{a}\n{b}\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
