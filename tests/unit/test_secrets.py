"""The one secrets policy (tasks/secrets.py): what counts as a credential, masked alike by settings,
tracking and the CLI, and no second policy left in those modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import SecretStr

from tasks import secrets
from tasks.secrets import MASK, is_secret_key, looks_like_secret, mask_secrets, mask_text, mask_uri, secret_value

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("key,secret", [
    ("aws_secret_access_key", True), ("mlflow_tracking_token", True), ("db.password", True),
    ("X-Amz-Signature", True), ("X-Amz-Credential", True), ("openai_api_key", True), ("aws_access_key_id", True),
    ("key", False), ("pretrain.key", False), ("config_hash", False), ("kd.combine", False),
])
def test_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_query_names_key_and_sig_only_in_a_query() -> None:
    assert is_secret_key("key", query=True) and is_secret_key("sig", query=True)
    assert mask_uri("https://maps.example/api?key=AIzaXYZ&q=1") == f"https://maps.example/api?key={MASK}&q=1"
    assert mask_uri("https://blob.example/c/f?sv=2024&sig=abc%2Bdef") == f"https://blob.example/c/f?sv=2024&sig={MASK}"
    # a parameter named "key" (a stage's content key) is not a credential
    assert mask_secrets({"key": "86f5ef81544c"}) == {"key": "86f5ef81544c"}


def test_values_shaped_like_credentials_whatever_their_key() -> None:
    assert looks_like_secret("AKIAABCDEFGHIJKLMNOP") and looks_like_secret("Bearer abc.def")
    assert looks_like_secret(SecretStr("x")) and not looks_like_secret("toy-teacher/v2")
    masked = mask_secrets({"note": "hf_" + "a" * 20, "nested": {"uri": "postgresql://u:pw@db/x", "steps": 4},
                           "list": [{"token": "t"}]})
    assert masked == {"note": MASK, "nested": {"uri": f"postgresql://u:{MASK}@db/x", "steps": 4},
                      "list": [{"token": MASK}]}


def test_text_and_plain_values() -> None:
    assert mask_text("cannot reach http://u:pw@h:1/x?token=t (retry)") == \
        f"cannot reach http://u:{MASK}@h:1/x?token={MASK} (retry)"
    assert secret_value(SecretStr("s")) == "s" and secret_value(None) is None and secret_value("p") == "p"


def test_settings_and_tracking_mask_through_this_module() -> None:
    """One policy: the modules that mask import it, and define no marker list or masking function of their own."""
    import tasks.settings
    import tasks.tracking

    assert tasks.settings.mask_uri is secrets.mask_uri and tasks.tracking.mask_secrets is secrets.mask_secrets
    for path in ("tasks/settings.py", "tasks/tracking.py", "tasks/storage.py", "flows/cli_checks.py"):
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}  # module level: methods only consume
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        own = {name for name in defined | assigned if any(w in name.lower() for w in ("secret", "mask"))
               and name != "mask_uri_in_text"}
        assert not own, f"{path} defines its own secrets policy: {sorted(own)}"
