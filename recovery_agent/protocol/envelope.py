"""Signed envelopes: the one place where signatures are made and checked.

Shape: DSSE (https://github.com/secure-systems-lab/dsse). The signature covers
``PAE(payloadType, payload)``, so the payload type is signed along with the bytes and one kind
of message can never be presented as another. The exact signed bytes travel (base64 in the
envelope); nothing is re-serialised before it is checked.

``open_envelope`` is the only way to get a message out of an envelope, and it does the checks
in this order: strict JSON of the envelope, a signature by a key from the caller's keyring
over PAE(type, payload), then the payload type, then strict JSON and the pydantic model of the
payload. Code elsewhere receives a ``Verified`` message or an ``EnvelopeError``; it never sees
unverified data.

Keys (``keys.py``) are Ed25519; a key id is the sha256 of the raw 32-byte public key, in hex.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from .errors import ProtocolError, describe_validation
from .keys import SigningKey, key_id, public_from_b64
from .wire import (
    Directive,
    Enrollment,
    KnownBadRule,
    RecoveryTest,
    RemediationApproval,
    RuleApproval,
    SignedMessage,
)

MAX_ENVELOPE_BYTES = 1 << 20
# How far ahead of the device's clock a directive's issued_at may be (clocks drift; a device
# in recovery may have lost its time): beyond it, the directive is refused.
MAX_CLOCK_SKEW = timedelta(hours=24)

M = TypeVar("M", bound=SignedMessage)


# --------------------------------------------------------------------------- errors


class EnvelopeError(ProtocolError):
    """Base: an envelope was refused. The message says why and what to do."""


class MalformedEnvelope(EnvelopeError):
    """Raised when the bytes are not a well-formed envelope or payload (bad JSON, duplicate
    keys, bad base64, a payload that does not fit its model)."""


class UnknownKey(EnvelopeError):
    """Raised when no signature is by a key the verifier trusts."""


class BadSignature(EnvelopeError):
    """Raised when a signature by a trusted key does not verify: the envelope was altered."""


class WrongPayloadType(EnvelopeError):
    """Raised when a correctly signed envelope carries another kind of message than expected."""


# --------------------------------------------------------------------------- strict JSON

# How deep arrays and objects may nest. The deepest real message (a directive inside a poll
# answer, an approval inside it) is under 10 levels; Python's parser would recurse far deeper.
MAX_JSON_DEPTH = 64
# Whole numbers every JSON parser represents exactly (RFC 7493, I-JSON): within +-(2**53 - 1).
MAX_JSON_INT = 2**53 - 1

_STRINGS = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedEnvelope(
                f"duplicate JSON key {key[:64]!r}: a signed document must have one meaning; "
                "the sender must emit each key once"
            )
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise MalformedEnvelope(f"JSON constant {name} is not allowed: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedEnvelope(
            f"number {text[:32]} is out of range: numbers must be finite (at most about 1.8e308)"
        )
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 17 or abs(value := int(text)) > MAX_JSON_INT:
        raise MalformedEnvelope(
            f"whole number {text[:32]}{'…' if len(text) > 32 else ''} is out of range: "
            f"JSON whole numbers must be within +-{MAX_JSON_INT} (2**53 - 1)"
        )
    return value


def _check_depth(data: bytes) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before the parser recurses into it: count the
    brackets outside strings (linear: possessive patterns never backtrack)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return
    depth = 0
    for byte in _STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise MalformedEnvelope(
                    f"JSON nested deeper than {MAX_JSON_DEPTH} levels: no message of this API nests so deep"
                )
        else:
            depth -= 1


def _check_strings(obj: Any) -> None:
    """Every string (and key) must be encodable as UTF-8: a lone surrogate escape such as
    \\ud800 parses, but could not be stored or sent on."""
    if isinstance(obj, str):
        if not obj.isascii():
            try:
                obj.encode()
            except UnicodeEncodeError:
                raise MalformedEnvelope(
                    "a JSON string holds a lone surrogate (\\ud800-\\udfff escape): escape "
                    "characters outside the BMP as a surrogate pair, or send them as UTF-8"
                ) from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_strings(key)
            _check_strings(value)
    elif isinstance(obj, list):
        for value in obj:
            _check_strings(value)


def strict_json_loads(data: bytes | str) -> Any:
    """Parse JSON as every party of this protocol must send it, or raise MalformedEnvelope
    naming the problem: UTF-8 text without a byte-order mark (RFC 8259), each object key once
    (a signed document must have one meaning), finite numbers only (no NaN/Infinity, nor a
    literal such as 1e400 that overflows to infinity), whole numbers within +-(2**53 - 1), at
    most MAX_JSON_DEPTH levels of nesting, and no lone surrogates in strings. Parsers disagree
    on each of these; what one accepts here can be stored, served back and signed."""
    if isinstance(data, str):
        text = data
        raw = data.encode(errors="surrogatepass")
    else:
        raw = bytes(data)
        if raw.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
            raise MalformedEnvelope(
                "the JSON starts with a byte-order mark: send UTF-8 without a BOM (RFC 8259)"
            )
        if b"\x00" in raw:  # never in JSON text, but in every UTF-16 or UTF-32 one
            raise MalformedEnvelope("the JSON holds NUL bytes, so it is not UTF-8 text (UTF-16?): send UTF-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedEnvelope(
                f"the JSON is not UTF-8 text (byte {exc.start}: {exc.reason}): send UTF-8, "
                "not UTF-16 or another encoding"
            ) from None
    _check_depth(raw)
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except MalformedEnvelope:
        raise
    except RecursionError:
        raise MalformedEnvelope(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise MalformedEnvelope(f"not valid JSON: {str(exc)[:200]}") from None
    if _SURROGATE_ESCAPE.search(text):  # only a \\u escape can make a lone surrogate
        _check_strings(obj)
    return obj


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- envelopes


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise MalformedEnvelope(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, and UnicodeEncodeError for non-ASCII text
        raise MalformedEnvelope(f"{what} is not valid base64") from None


def seal(message: SignedMessage, key: SigningKey) -> dict[str, Any]:
    """Serialise ``message`` and sign it; returns the envelope as a JSON-ready dict."""
    payload = canonical_json(message.model_dump(mode="json"))
    sig = key.private.sign(pae(message.PAYLOAD_TYPE, payload))
    return {
        "payload": _b64(payload),
        "payloadType": message.PAYLOAD_TYPE,
        "signatures": [{"keyid": key.key_id, "sig": _b64(sig)}],
    }


def seal_bytes(message: SignedMessage, key: SigningKey) -> bytes:
    return canonical_json(seal(message, key))


def payload_sha256(envelope: Mapping[str, Any]) -> str:
    """sha256 of the exact payload bytes an envelope made by ``seal`` carries."""
    return hashlib.sha256(base64.b64decode(envelope["payload"])).hexdigest()


@dataclass(frozen=True)
class Verified(Generic[M]):
    """A message that passed every check, with the facts the checks established."""

    message: M
    key_id: str
    payload: bytes
    signature: bytes = b""  # the signature that verified, by ``key_id``

    @property
    def payload_sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    @property
    def signatures(self) -> list[dict[str, str]]:
        """The envelope's signatures as kept with a stored payload: the one that verified. With
        the payload and its type it makes an envelope that verifies again."""
        return [{"keyid": self.key_id, "sig": _b64(self.signature)}]


def open_envelope(
    raw: bytes | str | Mapping[str, Any], model: type[M], keyring: Mapping[str, Ed25519PublicKey]
) -> Verified[M]:
    """Verify ``raw`` against ``keyring`` and return the typed message, or raise EnvelopeError.

    ``keyring`` maps key ids to the public keys trusted *for this message*: the device's own
    key for its diagnostics, the pinned server key for a directive.
    """
    if isinstance(raw, Mapping):
        env = dict(raw)  # already parsed by a strict parser upstream (e.g. a poll answer)
    else:
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise MalformedEnvelope(f"envelope is {len(raw)} bytes, over the {MAX_ENVELOPE_BYTES} limit")
        env = strict_json_loads(raw)
    if not isinstance(env, dict) or set(env) != {"payload", "payloadType", "signatures"}:
        raise MalformedEnvelope(
            "not a signed envelope: expected exactly the keys payload, payloadType, signatures"
        )
    payload_type = env["payloadType"]
    if not isinstance(payload_type, str):
        raise MalformedEnvelope("payloadType must be a string")
    payload = _unb64(env["payload"], "payload")
    sigs = env["signatures"]
    if not isinstance(sigs, list) or not sigs or len(sigs) > 8:
        raise MalformedEnvelope("signatures must be a list of 1 to 8 entries")

    signed_by: str | None = None
    signature = b""
    for entry in sigs:
        if not isinstance(entry, dict) or set(entry) - {"keyid", "sig"} or "sig" not in entry:
            raise MalformedEnvelope("each signature must be {keyid, sig}")
        kid = entry.get("keyid")
        if not isinstance(kid, str) or kid not in keyring:
            continue
        sig = _unb64(entry["sig"], "signature")
        try:
            keyring[kid].verify(sig, pae(payload_type, payload))
        except InvalidSignature:
            raise BadSignature(
                f"signature by key {kid[:16]}… does not verify: the envelope was altered in "
                "transit or signed with another key; nothing was applied"
            ) from None
        signed_by, signature = kid, sig
        break
    if signed_by is None:
        named = ", ".join(str(e.get("keyid", "?"))[:16] for e in sigs if isinstance(e, dict))
        raise UnknownKey(
            f"no signature by a trusted key (signed by: {named or 'nobody'}): enroll the device, "
            "or pin the right server key in the agent's settings"
        )

    if payload_type != model.PAYLOAD_TYPE:
        raise WrongPayloadType(
            f"expected a {model.PAYLOAD_TYPE} envelope, got {payload_type}: one kind of signed "
            "message cannot stand in for another"
        )
    obj = strict_json_loads(payload)
    try:
        message = model.model_validate(obj)
    except ValidationError as exc:
        raise MalformedEnvelope(
            f"{model.__name__} payload does not fit the protocol: {describe_validation(exc)}"
        ) from None
    return Verified(message=message, key_id=signed_by, payload=payload, signature=signature)


# --------------------------------------------------------------------------- directives


class DirectiveRejected(EnvelopeError):
    """Raised when a correctly signed directive is not for this device, this report or now."""


def actions_digest(actions: list[Any]) -> str:
    """sha256 of the canonical JSON of a remediation's actions: what approvers sign."""
    return hashlib.sha256(
        canonical_json([a.model_dump(mode="json") if hasattr(a, "model_dump") else a for a in actions])
    ).hexdigest()


def rule_digest(rule: KnownBadRule) -> str:
    """sha256 of the canonical JSON of a known-bad rule: what its approvers sign."""
    return hashlib.sha256(canonical_json(rule.model_dump(mode="json"))).hexdigest()


def verify_approvals(
    directive: Directive, approver_keyring: Mapping[str, Ed25519PublicKey], threshold: int
) -> list[str]:
    """The key ids of distinct pinned approvers whose signed approval covers exactly this
    directive's remediation and actions (or, for a directive made from a known-bad rule,
    exactly that rule, every action following from it); DirectiveRejected if fewer than
    ``threshold``."""
    rule = directive.rule
    if rule is not None:
        # Checked whatever the threshold: a rule's directive does what its rule says, or nothing.
        stray = [i for i, a in enumerate(directive.actions) if not rule.allows(a)]
        if stray:
            raise DirectiveRejected(
                f"directive {directive.directive_id}: action(s) {stray} do not follow from known-bad "
                f"rule {rule.rule_id} (quarantine {rule.path_pattern} with sha256 {rule.sha256[:12]}…): "
                "refused, nothing applied"
            )
    if threshold <= 0:
        return []
    digest = actions_digest(directive.actions) if rule is None else rule_digest(rule)
    signers: list[str] = []
    problems: list[str] = []
    for env in directive.approvals:
        try:
            if rule is None:
                v: Verified[Any] = open_envelope(env, RemediationApproval, approver_keyring)
                covers = (v.message.remediation_id, v.message.actions_sha256) == (
                    directive.remediation_id,
                    digest,
                )
            else:
                v = open_envelope(env, RuleApproval, approver_keyring)
                covers = (v.message.rule_id, v.message.rule_sha256) == (rule.rule_id, digest)
        except EnvelopeError as exc:
            problems.append(str(exc).split(":")[0])
            continue
        if not covers:
            what = "other actions" if rule is None else "another rule"
            problems.append(f"{v.message.approver}'s approval is for {what}")
            continue
        if v.key_id not in signers:
            signers.append(v.key_id)
    if len(signers) < threshold:
        why = f" ({'; '.join(problems)})" if problems else ""
        raise DirectiveRejected(
            f"directive {directive.directive_id} carries {len(signers)} valid approver signature(s) "
            f"and this device requires {threshold}{why}: refused, nothing applied"
        )
    return signers


def open_directive(
    raw: bytes | str | Mapping[str, Any],
    keyring: Mapping[str, Ed25519PublicKey],
    *,
    device_id: str,
    agent_nonce: str,
    diagnostics_sha256: str,
    now: datetime,
    approver_keyring: Mapping[str, Ed25519PublicKey] | None = None,
    approver_threshold: int = 0,
    test_visit: bool = False,
) -> Verified[Directive]:
    """Verify a directive and its binding: this device, the nonce this agent sent, the exact
    diagnostics it answers, not expired, not issued more than ``MAX_CLOCK_SKEW`` in this
    device's future (its lifetime is bounded by the model), and (if the device pins approver
    keys) signed by enough of those people. Only then may the agent act on it.

    A ``test_visit`` (test mode, armed on the device) takes only a recovery test directive
    (``RecoveryTest`` actions and nothing else), and needs no approver: it changes nothing on
    the OS outside the agent's own state. Any other visit refuses one: a test directive must
    never stand for a fix."""
    verified = open_envelope(raw, Directive, keyring)
    d = verified.message
    if d.device_id != device_id:
        raise DirectiveRejected(
            f"directive {d.directive_id} is for device {d.device_id!r}, not this device "
            f"({device_id!r}): refused, nothing applied"
        )
    if d.agent_nonce != agent_nonce:
        raise DirectiveRejected(
            f"directive {d.directive_id} answers another request (nonce mismatch): a replayed "
            "or misrouted directive; refused, nothing applied"
        )
    if d.diagnostics_sha256 != diagnostics_sha256:
        raise DirectiveRejected(
            f"directive {d.directive_id} answers other diagnostics than the ones this agent "
            "sent: refused, nothing applied"
        )
    if now >= d.expires_at:
        raise DirectiveRejected(
            f"directive {d.directive_id} expired at {d.expires_at.isoformat()} (now "
            f"{now.isoformat()}): ask the server for a fresh one; check the device clock"
        )
    # The model bounds the lifetime (wire.MAX_DIRECTIVE_LIFETIME); a directive issued far in
    # this device's future would still outlive any sane expiry ("expires in 9999").
    if d.issued_at > now + MAX_CLOCK_SKEW:
        raise DirectiveRejected(
            f"directive {d.directive_id} was issued at {d.issued_at.isoformat()}, more than "
            f"{MAX_CLOCK_SKEW} after this device's time ({now.isoformat()}): check the device "
            f"clock and the server's"
        )
    tests = [a for a in d.actions if isinstance(a, RecoveryTest)]
    if test_visit:
        if len(tests) != len(d.actions):
            raise DirectiveRejected(
                f"directive {d.directive_id} would change the OS on a recovery test visit (only "
                "the recovery_test action may run on one): refused, nothing applied"
            )
        return verified
    if tests:
        raise DirectiveRejected(
            f"directive {d.directive_id} is a recovery test's, and this visit is no test (the "
            "device did not arm test mode): refused, nothing applied"
        )
    verify_approvals(d, approver_keyring or {}, approver_threshold)
    return verified


def open_enrollment(raw: bytes | str) -> Verified[Enrollment]:
    """Verify an enrollment: self-signed, by the very key it enrolls (proof of possession).
    Whether the enrollment token is valid is the server's decision, after this."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise MalformedEnvelope("enrollment envelope too large")
    env = strict_json_loads(raw)
    if not isinstance(env, dict):
        raise MalformedEnvelope("not a signed envelope")
    # Read the claimed key from the payload only to know which key must have signed it; the
    # payload is trusted only after open_envelope has checked that signature.
    payload = strict_json_loads(_unb64(env.get("payload"), "payload"))
    claimed = payload.get("public_key") if isinstance(payload, dict) else None
    if not isinstance(claimed, str):
        raise MalformedEnvelope("enrollment payload has no public_key string (base64 of the raw Ed25519 key)")
    try:
        pub = public_from_b64(claimed)
    except ValueError as exc:
        raise MalformedEnvelope(f"enrollment payload's public_key: {exc}") from None
    return open_envelope(env, Enrollment, {key_id(pub): pub})
