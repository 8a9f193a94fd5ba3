"""bastion.models — what a model is: manifest schema, bundles on disk, the vendored zoo."""

from bastion.models.bundle import Bundle
from bastion.models.manifest import Manifest
from bastion.models.zoo import DEFAULT_DETECTOR, zoo_names, zoo_path

__all__ = ["Bundle", "Manifest", "DEFAULT_DETECTOR", "zoo_names", "zoo_path"]
