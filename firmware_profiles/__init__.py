"""Device classes as data (one TOML file per class) and their validation."""

from edgeslice.firmware_profiles.schema import (
    FirmwareProfile,
    LinkProfile,
    list_profiles,
    load_profile,
    profile_from_dict,
    profile_names,
    profile_to_dict,
    validate_file,
)

__all__ = [
    "FirmwareProfile",
    "LinkProfile",
    "list_profiles",
    "load_profile",
    "profile_from_dict",
    "profile_names",
    "profile_to_dict",
    "validate_file",
]
