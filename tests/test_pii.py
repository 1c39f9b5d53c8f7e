"""PII redaction per type, and look-alikes that must be left alone."""
import pytest

from fmkit.data.pii import PIIRedact, luhn_ok
from fmkit.data.sources import Doc


def redact(text):
    d = Doc("d", text)
    PIIRedact()(d)
    return d.text, dict(d.counts)


@pytest.mark.parametrize("text,expect,kind", [
    ("mail jane.doe+tag@example.co.uk today", "mail <EMAIL> today", "email"),
    ("server at 192.168.10.254, port 80", "server at <IP_ADDRESS>, port 80", "ip_address"),
    ("v6 2001:db8:85a3::8a2e:370:7334 here", "v6 <IP_ADDRESS> here", "ip_address"),
    ("call (555) 123-4567 now", "call <PHONE> now", "phone"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("card 5500-0000-0000-0004 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("id AKIAIOSFODNN7EXAMPLE end", "id <AWS_KEY> end", "aws_key"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "aws_secret_access_key = <AWS_KEY>", "aws_key"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----\nafter",
     "<PRIVATE_KEY>\nafter", "private_key"),
    ("token ghp_" + "a1B2" * 9 + " used", "token <API_TOKEN> used", "api_token"),
    ('API_KEY = "f3a9c2e1b7d84a6f9e0c"', 'API_KEY = "<SECRET>"', "secret"),
])
def test_each_type_is_redacted_and_counted(text, expect, kind):
    out, counts = redact(text)
    assert out == expect
    assert counts == {f"pii_{kind}": 1}


@pytest.mark.parametrize("text", [
    "Python version 3.11.7.1 was released",           # dotted version number, not an IP address
    "release 1.2.3.4 notes",
    "upgrade to v10.0.0.1 soon",
    "the value 999.1.1.1 is not an address",          # octet out of range
    "slice x[1::2] and time 12:30:45",                # not IPv6
    "order 4111 1111 1111 1112 total",                # fails Luhn
    "count 1234567890123456 rows",                    # no card network prefix / Luhn
    "answer = 5551234567",                            # bare integer in code, no separators
    "see user@localhost for details",                 # no top-level domain
    "password = \"<your password here>\"",            # a placeholder, not a secret
    "decorator @property and a@b",
])
def test_look_alikes_are_left_alone(text):
    out, counts = redact(text)
    assert out == text and counts == {}


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")
