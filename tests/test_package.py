"""The package's public surface stays deliberate."""

import smart_proxy


def test_public_names() -> None:
    assert sorted(smart_proxy.__all__) == [
        "BadRequest",
        "Catalog",
        "Config",
        "ConfigError",
        "Lease",
        "ModelLoadFailed",
        "ModelLoadTimeout",
        "ModelNotFound",
        "Pool",
        "PoolBusy",
        "ProxyError",
        "UpstreamError",
        "__version__",
        "load_config",
        "serve",
    ]
    for name in smart_proxy.__all__:
        assert getattr(smart_proxy, name) is not None
