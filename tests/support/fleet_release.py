"""One release as ``gapcast fleet publish`` makes it, for tests that hand messages to an updater directly."""

from __future__ import annotations

from gapcast.deploy.fleet import build_manifest, chunk_artifact, pack_bundle, sign_manifest
from gapcast.edge.release import FleetTopics, Manifest, Targets
from support.fleet_fakes import FLEET, PREFIX


def release(bundle_dir, key, *, sequence, targets=None, kind="release", chunk_bytes=700, rollback_from=None):
    """(envelope, [(chunk topic, bytes)], manifest) for a bundle folder signed with ``key``."""
    bundle, art = pack_bundle(bundle_dir)
    d = build_manifest(
        bundle, art, fleet=FLEET, targets=targets or Targets(everyone=True), sequence=sequence,
        chunk_bytes=chunk_bytes, kind=kind, rollback_from=rollback_from,
    )  # fmt: skip
    topics = FleetTopics(PREFIX, FLEET)
    chunks = [(topics.chunk(d["artifact"]["id"], i), c) for i, c in enumerate(chunk_artifact(art, chunk_bytes))]
    return sign_manifest(d, key), chunks, Manifest.from_dict(d)
