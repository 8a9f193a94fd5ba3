"""Loading the node's models: every load and every refusal leaves its line in the audit log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bastion.edge.audit import AuditLog
from bastion.edge.config import NodeConfig
from bastion.errors import BastionError
from bastion.runtime.detect import Detector

if TYPE_CHECKING:
    from bastion.runtime.lm import Generator


def load_detector(config: NodeConfig, audit: AuditLog, model: str, audit_refusal: bool = True) -> Detector:
    """The detection bundle ``model`` with the node's settings; verified, and audited as loaded or refused."""
    c = config
    try:
        detector = Detector.load(
            model,
            device=c.device,
            threads=c.threads,
            conf=c.conf,
            iou=c.iou,
            imgsz=c.imgsz,
            max_batch=c.max_batch,
            allow_unsigned=c.security.allow_unsigned,
            int8_policy=c.int8_policy,
            nation=c.nation,  # None: BASTION_NATION, else no releasability check
        )
    except BastionError as exc:
        if audit_refusal:  # reload audits its refusals itself, coalesced per client
            audit.append("bundle_refused", model=str(model), reason=str(exc))
        raise
    audit.append(
        "bundle_loaded",
        model=str(model),
        name=detector.manifest.name,
        sha256=detector.bundle_sha256,
        signer=detector.verified_by,
    )
    if detector.verified_by is None:
        audit.append("allow_unsigned_used", model=str(model), sha256=detector.bundle_sha256)
    if detector.int8_check is not None and not detector.int8_check.same:  # runtime/int8_check.py
        check = detector.int8_check  # int8_cpu_mismatch, or int8_fallback_fp32 when strict runs the FP32 sibling
        audit.append(check.audit_kind, sha256=detector.bundle_sha256, **check.audit_fields())
    return detector


def load_lm(config: NodeConfig, audit: AuditLog, model: str) -> Generator:
    """The ``task: lm`` bundle the ``ask`` op answers with; verified like the detector, audited the same way."""
    from bastion.runtime.lm import Generator

    try:
        generator = Generator.load(
            model, allow_unsigned=config.security.allow_unsigned, nation=config.nation
        )  # None: BASTION_NATION, else no releasability check
    except BastionError as exc:
        audit.append("bundle_refused", model=str(model), reason=str(exc))
        raise
    b = generator.bundle
    audit.append(
        "bundle_loaded",
        model=str(model),
        name=b.manifest.name,
        sha256=b.sha256,
        signer=b.verification.key_id,
        task="lm",
    )
    return generator
