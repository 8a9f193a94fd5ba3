"""Maintainers' script: sign the vendored zoo bundles with the project zoo key.

The zoo *private* key never enters this repository. Keep it offline; to rotate it
(or after changing any zoo manifest when the old key is not at hand):
    bastion keys generate --out /secure/place/bastion-zoo
    .venv/bin/python scripts/sign_zoo.py /secure/place/bastion-zoo.key
This writes each zoo bundle's `signature` and replaces the built-in trust anchor
in models/anchors/ with the new public key (the old anchor file is removed).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bastion.models.bundle import verify_files
from bastion.models.keys import key_id, load_private_key, passphrase_from_env, public_pem
from bastion.models.manifest import MANIFEST_NAME, read_manifest
from bastion.models.signing import sign_manifest
from bastion.models.trust import ANCHORS_DIR
from bastion.models.zoo import ZOO_DIR, zoo_names


def main(private_key: Path) -> None:
    key = load_private_key(private_key, passphrase_from_env())
    kid = key_id(key.public_key())
    for old in ANCHORS_DIR.glob("bastion-zoo-*.pub"):
        old.unlink()
    ANCHORS_DIR.mkdir(exist_ok=True)
    (ANCHORS_DIR / f"bastion-zoo-{kid}.pub").write_bytes(public_pem(key.public_key()))
    for name in zoo_names():
        root = ZOO_DIR / name
        manifest = read_manifest(root / MANIFEST_NAME)
        verify_files(root, manifest)
        sign_manifest(root, manifest, key)
        print(f"signed {name} with zoo key {kid}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
