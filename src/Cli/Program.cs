using Moe.Runtime.Commands;

return MoeCommands.Run(MoeCommands.CreateRoot(), args);
