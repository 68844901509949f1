// These tests run servers and clients on loopback with deadlines of a few seconds; run one test at a time so
// that on two cores they do not starve each other (or the thread pool the server runs on).
[assembly: CollectionBehavior(CollectionBehavior.CollectionPerAssembly)]
