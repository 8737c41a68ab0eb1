-- The Dagster instance's own database beside the OpsDB (created on the first start only).
CREATE DATABASE dagster OWNER ccat;
