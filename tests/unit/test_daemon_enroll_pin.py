"""The CA pin of `fleet-daemon enroll`: what the manager's served chain must prove."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from daemon.enroll import EnrollError, check_served_chain
from fleet.enroll import ca_hash
from fleet.pki import CertificateAuthority

MANAGER = "10.0.0.5:7443"


def der(*pems: bytes) -> list[bytes]:
    """Each certificate in the PEMs as DER, in order (what the TLS layer hands over)."""
    return [
        c.public_bytes(serialization.Encoding.DER)
        for pem in pems
        for c in x509.load_pem_x509_certificates(pem)
    ]


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    """The fleet's root CA (prod.example.com)."""
    return CertificateAuthority.create("prod.example.com")


def test_a_manager_certificate_signed_by_the_pinned_root_is_accepted(
    root: CertificateAuthority,
) -> None:
    """Leaf + root, pin = root: the pinned CA and its trust domain come back."""
    manager = root.issue("manager", "m1")
    pinned = check_served_chain(
        der(manager.cert_pem, root.cert_pem), ca_hash(root.cert_pem), MANAGER
    )
    assert pinned.trust_domain == "prod.example.com"
    assert pinned.cert_pem == root.cert_pem


def test_a_leaf_under_an_intermediate_chains_up_to_the_pinned_root(
    root: CertificateAuthority,
) -> None:
    """Leaf, intermediate, root: each link is checked up to the pinned root."""
    issuing = root.create_intermediate()
    manager = issuing.issue("manager", "m1")
    chain = der(manager.cert_pem, issuing.cert_pem, root.cert_pem)
    assert check_served_chain(chain, ca_hash(root.cert_pem), MANAGER).cert_pem == root.cert_pem


def test_a_chain_without_the_pinned_ca_is_refused(root: CertificateAuthority) -> None:
    """An interceptor serving its own CA: nothing in the chain matches the pin."""
    other = CertificateAuthority.create("prod.example.com")
    manager = other.issue("manager", "m1")
    with pytest.raises(EnrollError) as err:
        check_served_chain(der(manager.cert_pem, other.cert_pem), ca_hash(root.cert_pem), MANAGER)
    assert err.value.message == (
        f"the manager at {MANAGER} presented no CA matching {ca_hash(root.cert_pem)};"
        " check --ca-hash (fleetctl tokens create prints it) and --manager"
    )


def test_the_pinned_ca_appended_to_a_leaf_it_did_not_sign_is_refused(
    root: CertificateAuthority,
) -> None:
    """An interceptor appending the real CA to its own leaf: the leaf does not chain to it."""
    other = CertificateAuthority.create("prod.example.com")
    forged = other.issue("manager", "m1")
    with pytest.raises(EnrollError, match=r"that the CA matching sha256:[0-9a-f]+ did not sign"):
        check_served_chain(der(forged.cert_pem, root.cert_pem), ca_hash(root.cert_pem), MANAGER)


def test_an_intermediate_the_pinned_root_did_not_sign_breaks_the_chain(
    root: CertificateAuthority,
) -> None:
    """Leaf under another root's intermediate, with the pinned root appended: refused."""
    other = CertificateAuthority.create("prod.example.com").create_intermediate()
    leaf = other.issue("manager", "m1")
    chain = der(leaf.cert_pem, other.cert_pem, root.cert_pem)
    with pytest.raises(EnrollError, match="did not sign"):
        check_served_chain(chain, ca_hash(root.cert_pem), MANAGER)


def test_a_chain_with_no_ca_at_all_hints_at_the_wrong_port(root: CertificateAuthority) -> None:
    """The manager's mTLS port serves its leaf alone: the message asks about --manager."""
    manager = root.issue("manager", "m1")
    with pytest.raises(EnrollError) as err:
        check_served_chain(der(manager.cert_pem), ca_hash(root.cert_pem), MANAGER)
    assert err.value.message.endswith(
        "and no CA at all: is --manager the manager's enrollment port?"
    )


def test_a_pin_of_the_leaf_itself_is_refused_as_not_a_ca(root: CertificateAuthority) -> None:
    """Pinning the manager's own certificate pins no CA."""
    manager = root.issue("manager", "m1")
    with pytest.raises(EnrollError, match="is not a CA; check --ca-hash"):
        check_served_chain(der(manager.cert_pem, root.cert_pem), ca_hash(manager.cert_pem), MANAGER)


def test_a_server_that_is_not_a_manager_is_refused(root: CertificateAuthority) -> None:
    """A node's certificate from the right CA does not carry manager.<td>."""
    node = root.issue("node", "web-1")
    with pytest.raises(EnrollError) as err:
        check_served_chain(der(node.cert_pem, root.cert_pem), ca_hash(root.cert_pem), MANAGER)
    assert "presented a certificate for web-1.node.prod.example.com" in err.value.message
    assert "not manager.prod.example.com; refusing to enroll" in err.value.message


def test_an_empty_or_unreadable_chain_is_refused(root: CertificateAuthority) -> None:
    """No certificate, or bytes that are none, end enrollment with a line saying so."""
    pin = ca_hash(root.cert_pem)
    with pytest.raises(EnrollError, match="presented no certificate"):
        check_served_chain([], pin, MANAGER)
    with pytest.raises(EnrollError, match="presented an unreadable certificate"):
        check_served_chain([b"not DER"], pin, MANAGER)
