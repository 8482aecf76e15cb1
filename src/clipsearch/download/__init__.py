"""The download stage: URL lists -> image shards (webdataset, parquet, files or tfrecord).

from clipsearch.download import DownloadConfig, download
run_stats = download(DownloadConfig(url_list="urls.parquet", output_folder="out/images", caption_col="caption"))
"""

from clipsearch.download.config import DownloadConfig
from clipsearch.download.runner import download

__all__ = ["DownloadConfig", "download"]
