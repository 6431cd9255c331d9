"""Provider keys stored in the database, encrypted (Fernet: AES-128-CBC with an HMAC) with SLUICE_SECRETS_KEY.

SLUICE_SECRETS_KEY is a comma-separated list of Fernet keys (`python -c "from cryptography.fernet import Fernet;
print(Fernet.generate_key().decode())"`): the first encrypts, every one decrypts, so a key is rotated by putting a
new one first. Without it, a key derived from DJANGO_SECRET_KEY is used; without either (the demo's random per-process
secret), no key can be stored and the admin says so (a key read from an environment variable still works).
"""

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class SecretsUnavailable(Exception):
    """No key to encrypt or decrypt with, or a stored key that none of the configured keys opens."""


def _fernet() -> MultiFernet:
    keys = [k.strip() for k in (settings.SLUICE_SECRETS_KEY or "").split(",") if k.strip()]
    if not keys and not settings.SECRET_KEY_MISSING:
        # A derived key, separate from every other use of SECRET_KEY.
        digest = hashlib.sha256(b"sluice.catalogue.secrets:" + settings.SECRET_KEY.encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    if not keys:
        raise SecretsUnavailable("Set SLUICE_SECRETS_KEY (or DJANGO_SECRET_KEY) to store provider keys.")
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError as exc:
        raise SecretsUnavailable("SLUICE_SECRETS_KEY is not a list of Fernet keys.") from exc


def encrypt(raw: str) -> str:
    return _fernet().encrypt(raw.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretsUnavailable("A stored provider key cannot be decrypted with SLUICE_SECRETS_KEY.") from exc
