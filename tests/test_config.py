"""Keys, regions and hosts: both key formats, region derivation, mismatches, hygiene."""

from __future__ import annotations

import base64
import pickle
import warnings

import pytest

from cio_outbox.config import (
    REGION_HOSTS,
    ApiKey,
    ConfigError,
    RegionMismatchWarning,
    normalize_host,
    resolve_target,
)

SECRET = "sk_eu_Zx9secretvalue"
LEGACY = "legacywritekey123"


def test_prefixed_keys_are_bearer_and_name_their_region() -> None:
    for raw, region in [("sk_us_abc", "us"), ("pk_eu_abc", "eu"), ("sk_eu_x", "eu")]:
        key = ApiKey(raw)
        assert key.scheme == "bearer"
        assert key.region == region
        assert key.authorization() == f"Bearer {raw}"


def test_legacy_keys_are_basic_with_empty_password() -> None:
    key = ApiKey(LEGACY)
    assert key.scheme == "basic" and key.region is None
    scheme, token = key.authorization().split(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode() == f"{LEGACY}:"


@pytest.mark.parametrize("raw", ["sk_xx_abc", "tk_us_abc", "sk_us", "SK_US_abc"])
def test_lookalike_prefixes_are_legacy_keys(raw: str) -> None:
    assert ApiKey(raw).scheme == "basic"


def test_keys_are_stripped_of_surrounding_whitespace_and_newlines() -> None:
    assert ApiKey(f"  {SECRET}\n").reveal() == SECRET
    assert ApiKey(f"{LEGACY}\r\n").reveal() == LEGACY


@pytest.mark.parametrize("raw", ["", "   ", "\n", "abc def", "abc\ndef", "abc\x00def", "a\tb"])
def test_empty_or_inner_whitespace_keys_are_refused_without_showing_them(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ApiKey(raw)
    if raw.strip():
        assert raw.strip() not in str(caught.value)


def test_key_never_shows_in_repr_str_or_pickle() -> None:
    key = ApiKey(SECRET)
    assert "secretvalue" not in repr(key)
    assert "secretvalue" not in str(key)
    assert "secretvalue" not in f"{key}"
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_region_comes_from_the_key_when_nothing_else_is_given() -> None:
    assert resolve_target(ApiKey("sk_eu_abc")).base_url == REGION_HOSTS["eu"]
    assert resolve_target(ApiKey("sk_us_abc")).base_url == REGION_HOSTS["us"]
    assert resolve_target(ApiKey(LEGACY)).base_url == REGION_HOSTS["us"]
    assert resolve_target(ApiKey(LEGACY), region="eu").base_url == REGION_HOSTS["eu"]
    assert resolve_target(ApiKey(LEGACY), region=" EU ").region == "eu"


def test_region_that_contradicts_the_key_is_an_error_naming_both_regions() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_target(ApiKey(SECRET), region="us")
    text = str(caught.value)
    assert "US" in text and "EU" in text and "secretvalue" not in text


def test_unknown_region_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not one of"):
        resolve_target(ApiKey(LEGACY), region="ap")


def test_explicit_host_wins_but_warns_when_it_is_the_other_regions_host() -> None:
    with pytest.warns(RegionMismatchWarning) as record:
        target = resolve_target(ApiKey(SECRET), host=REGION_HOSTS["us"], region="us")
    assert target.base_url == REGION_HOSTS["us"]
    message = str(record[0].message)
    assert "EU" in message and "US" in message and "secretvalue" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_target(ApiKey(SECRET), host=REGION_HOSTS["eu"])  # agrees: no warning


def test_host_takes_scheme_and_host_and_client_appends_v1() -> None:
    target = resolve_target(ApiKey(LEGACY), host="https://cdp.customer.io/")
    assert target.url("batch") == "https://cdp.customer.io/v1/batch"
    assert normalize_host("https://proxy.example.com/cio/v1") == "https://proxy.example.com/cio"
    assert normalize_host("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normalize_host("http://localhost:1") == "http://localhost:1"
    assert normalize_host("http://[::1]:1") == "http://[::1]:1"


def test_plain_http_to_a_non_loopback_host_is_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="unencrypted"):
        normalize_host("http://cdp.example.com")
    with pytest.raises(ConfigError, match="unencrypted"):
        normalize_host("http://10.0.0.5:8080")
    assert normalize_host("http://cdp.example.com", allow_insecure=True) == (
        "http://cdp.example.com"
    )


@pytest.mark.parametrize("host", ["cdp.customer.io", "ftp://x", "https://", ""])
def test_hosts_without_scheme_or_name_are_refused(host: str) -> None:
    with pytest.raises(ConfigError):
        normalize_host(host)


def test_from_env_reads_and_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIO_API_KEY", f"{SECRET}\n")
    assert ApiKey.from_env().reveal() == SECRET
    monkeypatch.delenv("CIO_API_KEY")
    with pytest.raises(ConfigError, match="CIO_API_KEY is not set"):
        ApiKey.from_env()
