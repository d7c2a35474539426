"""Big-batch search: a Dask job that reads every inverted list once for any number of queries.

``big_batch_search`` (``distann search --big-batch``) and ``open_result``; see
``bigbatch.driver`` for the stages and ``bigbatch.output`` for the result's format.
"""

from distann.bigbatch.driver import big_batch_search
from distann.bigbatch.output import BigBatchResult, open_result

__all__ = ["BigBatchResult", "big_batch_search", "open_result"]
