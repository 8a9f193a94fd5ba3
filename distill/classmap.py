"""Narrowing a teacher's classes to the mission's: ``--classes person,vehicle --class-map car=vehicle,…``."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.errors import ConfigError


@dataclass(frozen=True)
class ClassMap:
    """Student classes, and for each teacher class id the student class id it becomes (or none)."""

    student: list[str]
    teacher: list[str]
    to_student: dict[int, int]

    @classmethod
    def build(cls, teacher: list[str], classes: list[str], mapping: dict[str, str] | None = None) -> "ClassMap":
        """``classes`` are the student's names; ``mapping`` sends teacher names to them (identity by default)."""
        mapping = dict(mapping or {})
        if len(set(classes)) != len(classes) or not classes:
            raise ConfigError(f"--classes must be a non-empty list of distinct names, got {classes}")
        for src, dst in mapping.items():
            if dst not in classes:
                raise ConfigError(f"--class-map {src}={dst}: {dst!r} is not one of --classes {classes}")
        known = set(teacher)
        unknown = [n for n in list(mapping) + [c for c in classes if c not in mapping.values()] if n not in known]
        if unknown:
            sample = ", ".join(teacher[:20]) + (", …" if len(teacher) > 20 else "")
            raise ConfigError(f"no teacher knows {', '.join(repr(u) for u in unknown)}", f"valid names: {sample}")
        to_student = {}
        for tid, name in enumerate(teacher):
            target = mapping.get(name, name if name in classes else None)
            if target is not None:
                to_student[tid] = classes.index(target)
        return cls(list(classes), list(teacher), to_student)

    def groups(self) -> list[list[int]]:
        """For each student class, the teacher class ids that feed it."""
        out: list[list[int]] = [[] for _ in self.student]
        for tid, sid in sorted(self.to_student.items()):
            out[sid].append(tid)
        return out


def parse_class_map(text: str | None) -> dict[str, str]:
    """'car=vehicle,truck=vehicle' → {'car': 'vehicle', 'truck': 'vehicle'}."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        if not item.strip():
            continue
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ConfigError(f"--class-map item {item!r} must look like teacher_name=student_name")
        mapping[src.strip()] = dst.strip()
    return mapping
