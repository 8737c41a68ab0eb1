"""The stages of a package's journey, as the domain names them. The Dagster layer maps each
to its job and assets (ccat_assets/stages/); the domain never names a Dagster job."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    PACKAGING = "packaging"  # raw files -> tar + manifest at the observatory buffer
    SITE_COPY = "site_copy"  # the tar into a site's buffer (out of the observatory once)
    LTA_COPY = "lta_copy"  # the buffer copy into the site's long-term archive
    PURGE = "purge"  # sources and buffer copies deleted under certificates
    STAGING = "staging"  # archived packages unpacked at a processing location

    @property
    def label(self) -> str:
        """How `why`, `status` and notifications say it."""
        return {"lta_copy": "LTA copy"}.get(self.value, self.value.replace("_", " "))
