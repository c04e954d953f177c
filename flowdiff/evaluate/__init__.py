"""``flowdiff evaluate``: the command (:mod:`.command`), its plan (:mod:`.plan`), the work split
across ranks (:mod:`.sharding`) and the report (:mod:`.report`). What depends on the data (metrics,
floor, likelihood data, pictures) comes from the data's evaluator (``flowdiff.data.evaluators``).
"""
