from kdlab.modules.distill import DistillModule, SourceBank
from kdlab.modules.supervised import SupervisedModule

__all__ = ["DistillModule", "SourceBank", "SupervisedModule"]
