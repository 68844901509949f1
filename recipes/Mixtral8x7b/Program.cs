// Temporary entry point until the recipe generator emits one.
using Moe.Runtime.Commands;

return MoeCommands.Run(MoeCommands.CreateRoot(new Moe.Recipes.Mixtral8x7b().ToSettings()), args);
