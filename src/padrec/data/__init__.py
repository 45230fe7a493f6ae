from padrec.data.dataset import Dataset, EvalCase, ItemInfo, UserSplit, data_root, list_datasets, load_dataset

__all__ = ["Dataset", "EvalCase", "ItemInfo", "UserSplit", "data_root", "list_datasets", "load_dataset"]
