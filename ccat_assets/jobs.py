"""Jobs: one per stage, each materialising (and checking) one partition per run."""

from dagster import AssetSelection, define_asset_job

package_job = define_asset_job("package_job", AssetSelection.assets("raw_files", "packages"))
site_copy_job = define_asset_job("site_copy_job", AssetSelection.assets("site_copies"))
lta_copy_job = define_asset_job("lta_copy_job", AssetSelection.assets("lta_copies"))
purge_job = define_asset_job("purge_job", AssetSelection.assets("purge_status"))
staging_job = define_asset_job("staging_job", AssetSelection.assets("staged_copies"))
STAGES = [package_job, site_copy_job, lta_copy_job, purge_job, staging_job]
