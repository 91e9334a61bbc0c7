"""The protocol between recovery agents, the recovery server and its admins: the one package
the server imports from the agent's side.

- ``wire``: the messages (pydantic models), one DSSE payload type per signed message;
- ``envelope``: signing and the only way to open a signed message (``open_envelope``,
  ``open_directive``, ``open_enrollment``), returning ``Verified`` messages;
- ``keys``: Ed25519 keys, key ids and key files;
- ``crashreport``: the crash signature rules (a kernel report in, a ``CrashSignature`` out), so
  that agent and server make the same signature of the same report;
- ``client``: the HTTP transport with its retry rules and the device API (``DeviceClient``);
- ``admin``: the admin API's models and its typed client (``AdminClient``);
- ``errors``: ``ProtocolError``, the root of every error raised here;
- ``version``: the one version number.

Nothing here imports the rest of ``recovery_agent``: the agent builds on the protocol, never
the other way round.
"""
