"""fleet.enroll's CSR rules at their edges: the longest node names, unreadable CSRs."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleet.enroll import check_csr, make_csr
from fleet.identity import Identity
from fleet.pki import CertificateAuthority

TD = "fleet.local"


def test_the_longest_node_name_gets_a_csr_and_a_certificate() -> None:
    """A 63-character node id (its DNS name is past the 64-character CN limit) can enroll."""
    name = "n" * 63
    _, csr_pem = make_csr(Identity("node", name, TD))
    checked = check_csr(csr_pem, trust_domain=TD, node_name=name)
    ca = CertificateAuthority.create(TD)
    signed = ca.sign("node", name, checked.public_key, not_before=_t(0), not_after=_t(1))
    cert = x509.load_pem_x509_certificate(signed.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/node/{name}"]
    assert ca.issue("node", name).certificate.subject.rfc4514_string().startswith(f"CN={name},")


def test_a_csr_with_an_unknown_key_algorithm_is_a_value_error() -> None:
    """A CSR that loads but whose key algorithm is unknown is refused as bad input (it
    made cryptography raise UnsupportedAlgorithm, an INTERNAL for the caller)."""
    _, csr_pem = make_csr(Identity("node", "n1", TD))
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    ec_oid = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1, id-ecPublicKey
    at = bytes(der).index(ec_oid)
    der[at + 1] ^= 0x01
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ValueError, match="the CSR cannot be read"):
        check_csr(bad, trust_domain=TD, node_name="n1")


def _t(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=days)
