"""Signing keys and secrets at rest: SecretBox (AES-GCM under the master secret) and KeyRing
(RS256 keys: race-safe creation, rotation, JWKS, signing; verification from memory)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.common.cache import TtlCache
from services.common.logs import security_event
from storage.base import SigningKey, Storage

log = logging.getLogger("gateway.keys")

KEY_BITS = 2048
REFRESH_INTERVAL = 60.0  # how stale this process's view of the key set may get
UNKNOWN_KID_RETRY = 5.0  # a kid storage did not know is not looked up again for this long
UNKNOWN_KID_MEMORY = 1024  # how many such kids are remembered (oldest forgotten first)
MISS_READ_GAP = 0.5  # reads of the key set for unknown kids: one at a time, this far apart
KID_RE = re.compile(r"^[A-Za-z0-9_-]{16}$")  # secrets.token_urlsafe(12): the kids this gateway makes


def derive_key(master: bytes, purpose: str, length: int = 32) -> bytes:
    """A sub-key per purpose, so the cookie key never equals the encryption key."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose.encode()).derive(
        master
    )


def token_hash(value: str) -> str:
    """How secrets (codes, refresh tokens, client secrets) are stored and looked up.
    They are 256-bit random values, so a fast unsalted hash is enough."""
    return hashlib.sha256(value.encode()).hexdigest()


class SecretBox:
    """Authenticated encryption of small secrets at rest, with a version prefix so the
    scheme can change later."""

    PREFIX = "v1."

    def __init__(self, master: bytes):
        self._aead = AESGCM(derive_key(master, "mcpgw secretbox v1"))

    def seal(self, plaintext: bytes, context: str = "") -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return self.PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str, context: str = "") -> bytes:
        if not token.startswith(self.PREFIX):
            raise ValueError("unknown ciphertext version")
        raw = base64.urlsafe_b64decode(token[len(self.PREFIX) :])
        return self._aead.decrypt(raw[:12], raw[12:], context.encode())


@dataclass
class _LoadedKey:
    record: SigningKey
    public_key: object
    private_key: object | None  # only for the active key


class KeyRing:
    """The RS256 keys of the authorization server."""

    def __init__(self, storage: Storage, box: SecretBox, token_ttl: int, *,
                 now: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic):
        self._storage = storage
        self._box = box
        self._token_ttl = token_ttl
        self._now = now
        self._clock = clock
        self._keys: dict[str, _LoadedKey] = {}
        self._active: _LoadedKey | None = None
        self._loaded_at = 0.0
        self._fresh_since = float("-inf")  # start of the newest completed read of the key set
        self._missed = TtlCache(UNKNOWN_KID_MEMORY, UNKNOWN_KID_RETRY, clock=clock)  # kids storage did not know
        self._miss_read: asyncio.Future | None = None
        self._miss_read_at = float("-inf")

    async def load(self) -> None:
        """Read the key set; create the first key when there is none (race-safe)."""
        started = time.monotonic()  # orders real reads (see _read_after), not a cache's clock
        records = await self._storage.list_signing_keys()
        if not any(k.status == "active" for k in records):
            await self._storage.add_signing_key(self._new_key(), only_if_none_active=True)
            records = await self._storage.list_signing_keys()
        now = self._now()
        live = []
        for record in records:
            if record.status == "retiring" and record.retire_at < now:
                await self._storage.set_signing_key_status(record.kid, "retired")
            elif record.status != "retired":
                live.append(record)
        self._install(live)
        self._fresh_since = max(self._fresh_since, started)

    def _install(self, records: list[SigningKey]) -> None:
        keys: dict[str, _LoadedKey] = {}
        active = [r for r in records if r.status == "active"]
        newest = max(active, key=lambda r: r.created_at) if active else None
        for record in records:
            previous = self._keys.get(record.kid)
            public = previous.public_key if previous else jwt.PyJWK(record.public_jwk).key
            private = None
            if newest is not None and record.kid == newest.kid:
                private = previous.private_key if previous and previous.private_key else (
                    serialization.load_pem_private_key(
                        self._box.open(record.private_key_enc, "signing-key:" + record.kid),
                        password=None,
                    )
                )
            keys[record.kid] = _LoadedKey(record, public, private)
        self._keys = keys
        self._active = keys[newest.kid] if newest else None
        self._loaded_at = self._clock()

    def _new_key(self) -> SigningKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        kid = secrets.token_urlsafe(12)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return SigningKey(
            kid=kid,
            private_key_enc=self._box.seal(pem, "signing-key:" + kid),
            public_jwk=jwk,
            status="active",
            created_at=self._now(),
        )

    async def rotate(self) -> SigningKey:
        """New active key; the old ones keep verifying until their longest token expired."""
        old = [k for k in await self._storage.list_signing_keys() if k.status == "active"]
        new = self._new_key()
        await self._storage.add_signing_key(new)
        retire_at = self._now() + self._token_ttl + 300
        for key in old:
            await self._storage.set_signing_key_status(key.kid, "retiring", retire_at)
        await self.load()
        security_event("key_rotated", "signing key rotated; the old ones verify until their tokens expired",
                       kid=new.kid, retiring=len(old))
        return new

    async def refresh_if_stale(self) -> None:
        if self._clock() - self._loaded_at > REFRESH_INTERVAL:
            await self.load()

    async def ensure_kid(self, kid: str) -> bool:
        """True when `kid` is known, reading the key set again for a kid minted elsewhere
        (a rotation on another instance).

        Only kids of the gateway's own format are looked up, and a miss is remembered per
        kid (UNKNOWN_KID_RETRY, at most UNKNOWN_KID_MEMORY kids): one caller sending made-up
        kids never delays the lookup of a real new one. The reads themselves are shared
        and spaced (_read_after), so a flood of distinct made-up kids costs storage at
        most one read per MISS_READ_GAP and slows down only the flood's own requests."""
        if kid in self._keys:
            return True
        if not KID_RE.match(kid):
            return False
        if kid in self._missed:
            return False
        await self._read_after(time.monotonic())
        if kid in self._keys:
            self._missed.pop(kid)
            return True
        self._missed.set(kid, True)
        return False

    async def _read_after(self, asked: float) -> None:
        """Return once a read of the key set that started at or after `asked` completed
        (its failure, a storage error, is raised to every waiter). Such reads run one at
        a time, at least MISS_READ_GAP apart; the timer's and rotate's reads count too.
        Real monotonic time, not the injected clock: it orders and paces actual reads."""
        while self._fresh_since < asked:
            read = self._miss_read
            if read is None or read.done():
                wait = self._miss_read_at + MISS_READ_GAP - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                self._miss_read_at = time.monotonic()
                read = self._miss_read = asyncio.ensure_future(self.load())
                # Retrieved even when every waiter went away (a client hung up).
                read.add_done_callback(lambda done: done.cancelled() or done.exception())
            await asyncio.shield(read)

    def jwks(self) -> dict:
        return {"keys": [k.record.public_jwk for k in self._keys.values()]}

    def sign(self, claims: dict, typ: str = "at+jwt") -> str:
        if self._active is None or self._active.private_key is None:
            raise RuntimeError("KeyRing.load() has not run")
        return jwt.encode(
            claims,
            self._active.private_key,
            algorithm="RS256",
            headers={"kid": self._active.record.kid, "typ": typ},
        )

    def public_key(self, kid: str):
        loaded = self._keys.get(kid)
        return loaded.public_key if loaded else None

    def records(self) -> list[SigningKey]:
        return [k.record for k in self._keys.values()]
