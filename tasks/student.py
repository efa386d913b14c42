"""The task layer's half of the student folder (`snapgen_model.artifacts.student` owns its file names, card
schema and weights): the card written into storage beside uploaded weights."""
from __future__ import annotations

import tempfile
from typing import Any

from snapgen_model.artifacts.student import CARD, make_card, write_card
from tasks.storage import Storage


def write_student_card(store: Storage, folder_uri: str, cache_manifest: dict[str, Any], stage: str, key: str,
                       run_id: str) -> str:
    """`student.json` beside the student's weights: what evaluation and export need to use it as a
    text-to-image model (the teacher bundle whose text encoders and VAE it was trained on), plus
    its lineage. Written after the weights, so its presence marks a complete student folder."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_card(tmp, make_card(stage, key, run_id, cache_manifest))
        store.upload_file(str(path), store.join(folder_uri, CARD))
    return folder_uri
